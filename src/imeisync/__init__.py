"""imeisync: stolen-device IMEI blocklist synchroniser."""
__version__ = "0.1.0"
