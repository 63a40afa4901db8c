"""Lightning adapters over the framework-free core."""
