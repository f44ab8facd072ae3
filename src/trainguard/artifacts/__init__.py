"""Model files: container formats, pickle static analysis, the safe loader, conversion."""
