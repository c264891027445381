"""The control plane's plumbing: what the services add to the agent SDK (``broker``).

The service base and its lifecycle, JetStream streams and publishing, pull
consumers, the audit emitter, KV caches, SQL stores, the embedded
``nats-server``, identity (nkeys, auth callout), breakers and budgets,
service health, the OpenTelemetry providers. Needs the ``server`` extra
(``pip install 'signalbox[server]'``); the agent SDK never imports it.
"""

__all__: list[str] = []  # import its modules: broker.runtime.service, ...
