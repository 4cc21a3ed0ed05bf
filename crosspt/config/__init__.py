"""The one typed run schema (`schema.py`) and the search-space schema (`space.py`)."""
