"""berth server: engine, HTTP front end and CLI."""
