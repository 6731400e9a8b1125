"""The key store: API-key records in Redis, addressed by id or by presented secret."""
