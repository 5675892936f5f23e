"""How the facts are shown: tables, progress bars, Markdown, JSON and HTML. Nothing here reads
the database."""
