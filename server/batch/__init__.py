"""Offline scoring of files through the same ``InferenceService`` as the HTTP edge."""
