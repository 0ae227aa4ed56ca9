"""Model implementations (Llama family) and their checkpoint loader."""
