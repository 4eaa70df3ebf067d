"""The explorer's routes as Flask blueprints, one module per area (page, maps, slides, neighbours)."""
