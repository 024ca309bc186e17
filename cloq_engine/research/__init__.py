"""The research harness: the fine-tuning study that compares LoRA inits after training
(``cloq bench finetune``) and the named init variants ``cloq compare`` shares with it.

It sits on top of the engine and is no part of it: no engine module imports this package, and
``import cloq_engine`` does not load it. Modules, in the order a study uses them:

* ``variants``: named init variants (an init method plus how it is run), one registry;
* ``tasks``: what the LoRA factors are trained on and how the result is scored;
* ``training``: the one training recipe every init gets, and the linear probe at init;
* ``study``: the jobs a worker process runs (prepare and cache a model, fine-tune and score it);
* ``plan``: which jobs a study runs, and the learning rate each (task, init) gets;
* ``runner``: runs the jobs on worker processes, appending each result to ``runs.jsonl``;
* ``report``: the summary, the tables, the plot and ``results.json`` / ``at_init.json``.
"""
