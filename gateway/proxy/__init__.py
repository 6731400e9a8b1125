"""The proxy listener: routes, credentials, authorization and streaming to upstreams."""
