"""The commands that read and judge: audit before, verify and report after, and the ETL's corrected
statement."""
