"""Commands of the `featurescope` CLI that live in modules of their own (`register(sub)`)."""
