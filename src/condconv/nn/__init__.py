"""The layers and the engine under them: ``functional`` (one dynamic convolution, several strategies), ``ops/``
(the strategies' back-ends), ``routing`` (routers and temperatures), ``layers`` (CondConv2d, DynamicConv2d, ODConv2d),
``convert`` (static convolutions into dynamic ones) and ``reference`` (the slow per-example loop every path is
tested against)."""
