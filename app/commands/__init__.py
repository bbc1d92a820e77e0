"""CLI commands in modules of their own, each exposing `register(subparsers)`."""
