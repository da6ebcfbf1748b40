"""Where crawled data goes: staging writers and the PostgreSQL loader."""
