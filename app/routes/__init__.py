"""Web routes, one module per resource; `render` holds the last step every view shares."""
