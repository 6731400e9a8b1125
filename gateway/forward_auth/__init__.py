"""The auth listener: keygate as the authorizer of nginx, Traefik, Caddy and Envoy."""
