"""Small helpers every layer uses: atomic files, distributed wrappers, registries, mixed
precision, logging, statistics and seeding."""
