"""Herald's real-time core: registry, channels, transports, broker and auth."""
