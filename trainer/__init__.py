"""The trainer side: drive microbatches through the swarm's stages and train the model's local parts.

``trainer.model`` (``SwarmModelForCausalLM``, re-exported as ``swarm.SwarmModelForCausalLM``, a
facade over ``trainer.remote_layers``, ``trainer.local_parts`` and ``trainer.run_link``),
``trainer.pipeline`` (the fault-tolerant pipeline over remote stages), ``trainer.steps``
(collaborative steps), ``trainer.spotcheck``, ``trainer.generation``, ``trainer.export`` and
``trainer.reporting``.

May import: core, shards, dht, net, peers. Not delegation or bootstrap (its siblings); imported by
swarm only.
"""

__all__: list[str] = []
