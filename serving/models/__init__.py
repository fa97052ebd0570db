"""Models made offline (no hub download is possible in CI): see serving.models.tiny."""
