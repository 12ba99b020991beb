"""voxgate: a telephony daemon that answers calls and runs a voice agent on each."""

__version__ = "0.1.0"
