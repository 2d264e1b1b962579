"""The admin listener: Prometheus metrics, the JSON API and the live dashboard."""
