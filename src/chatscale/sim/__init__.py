"""Fleet simulator: chatscale's own Scheduler and KVCacheManager (and the gateway's routing and
admission classes) driven by a step-cost model instead of a model runner, from one replica to
thousands in several regions."""
