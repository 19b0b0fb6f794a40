"""Service discovery: registering services and watching their healthy instances."""
