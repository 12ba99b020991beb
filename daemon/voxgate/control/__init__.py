"""The control socket: a JSON-lines protocol (sans-IO), its Trio server and ``voxgatectl``."""
