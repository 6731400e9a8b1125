"""The listing dialects: other key services' management APIs, served on the proxy listener."""
