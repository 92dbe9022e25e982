"""Data: the face-record dataset with its resumable sampler, and the JPEG decoder."""
