"""What the tests and the benchmarks share, written once: local servers, ports, databases, staged parts, loader fixtures.

Import from the module that holds the thing (``from tests.helpers.net import free_port``);
this package re-exports nothing, so importing one helper never pulls in the others.
"""

__all__: list[str] = []
