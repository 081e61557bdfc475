"""`deploy-agent bootstrap`: install and enrol a worker on a host reached over SSH.

Every step is reported and a failure names its step; running it again is safe.
"""
