"""genzoo's pipeline stages (fetch, featnet, train, evaluate, report, sample, compare) and the CLI."""
