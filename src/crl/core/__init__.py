"""The bottom layer: errors, parameters, registries, seeds, verified files, file
helpers, run manifests and the name catalog. Imports nothing else of crl (so that
`crl --help` stays free of torch, this __init__ imports nothing)."""
