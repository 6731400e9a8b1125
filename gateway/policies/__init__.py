"""Request policies: each decides one thing from the key record and the request."""
