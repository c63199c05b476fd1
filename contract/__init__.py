"""What the offline and online halves agree on (design §11), torch-free (numpy only).

- `contract.features`: the feature schema and the id hashing (the same function offline
  and online).
- `contract.config`: the model configuration (`ModelConfig`) and its validation.
- `contract.bundle`: the bundle layout (file names, graph input/output names), the
  manifest schema and its validation, and the safe loader.
- `contract.limits`: the one check that serving limits fit a model.

`model/` (training), `export/` (checkpoint -> bundle) and `service/` (serving) import it;
it imports none of them, so the serving image ships it without `model/`.
"""
