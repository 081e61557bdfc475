"""The worker links: who is connected, what each was sent, and the answers owed."""
