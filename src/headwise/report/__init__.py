"""Self-contained reports: HTML pages with embedded PNG images and no external resources."""
