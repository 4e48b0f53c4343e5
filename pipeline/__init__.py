"""Ray Data pipeline: reads manifests, synthesizes speech, writes audio and metadata to object storage."""
