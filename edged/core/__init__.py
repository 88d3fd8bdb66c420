"""Domain types and errors: the only vocabulary shared by every layer of edged."""
