"""HTTP routes, one module per resource; each handler only translates HTTP to app services."""
