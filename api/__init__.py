"""Herald's REST sidecar: users, tokens and API keys, publishing every change into the hub."""
