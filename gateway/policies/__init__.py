"""Per-route decisions: which route a request takes, the scopes it needs, what it costs and
reserves, the headers keygate drops and the rate-limit headers it adds."""
