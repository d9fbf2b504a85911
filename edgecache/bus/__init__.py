"""The bus that carries invalidation events from the origin's log to every edge.

``base`` holds the contract (``Subscription``, ``Batch``, ``Report``); ``embedded`` and ``nats``
implement it. ``open_subscription(config, ...)`` picks one from ``BusConfig.kind``.
"""
