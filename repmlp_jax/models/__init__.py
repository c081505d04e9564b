"""The networks (Flax linen, NHWC): what a model computes, in its training and deploy forms.

Belongs here: the shared layers (`layers`), one module per model (`repmlpnet`, the v1 block
`repmlp_v1`, `repmlp_resnet`, `pure_mlp`) holding its variants as plain settings
(`ARCH_SETTINGS`), the factory that builds them by name (`factory.create_model`) and stage-feature
extraction (`features`). Not here: how a training form becomes a deploy form
(`repmlp_jax.reparameterize`), PyTorch names (`repmlp_jax.pytorch`), anything about data or
training. Modules here depend on nothing else in the package; a new model class is registered in
`repmlp_jax.families`.
"""
