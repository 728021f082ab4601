"""HTTP routes of the users API: parse the request, call a service, return a schema."""
