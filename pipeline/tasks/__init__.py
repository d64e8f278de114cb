"""Verifiable tasks: the bundled arithmetic word problems, their verifiers, and user prompt loaders."""
