"""train.py's own programs, lowered for a mesh of any devices, without data and without running.

The three programs a training run compiles (`repmlp_jax.train.experiment.Experiment`):
  train_step      the step exactly as train.py runs it: mixup / CutMix, label smoothing,
                  BatchNorm groups, gradient accumulation, clipping, EMA and the logged norms,
                  whatever the config turns on; global batch `global_batch_size`.
  eval_step       the training form in eval mode, as train.py's evaluation counts top-1 / top-5;
                  batch `eval_batch_size`, images in the compute dtype.
  deploy_forward  the same evaluation of the deploy form after `reparam`, its parameters in the
                  compute dtype, sharded as the compiled reparam leaves them.
Each comes with the useful FLOPs per image (`repmlp_jax.macs`: 2 per multiply-accumulate, a
training step 3 forwards) where the model is a RepMLPNet.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds

from repmlp_jax import macs
from repmlp_jax.commands import cli
from repmlp_jax.data import input_pipeline
from repmlp_jax.models import repmlpnet
from repmlp_jax.train import experiment
from repmlp_jax.train import sharding

# Training-split sizes of the tfds data sets, as their catalog publishes them: the schedule's
# length in steps depends on it, the compiled programs do not.
_TFDS_TRAIN_EXAMPLES = {'imagenet2012': 1_281_167, 'cifar10': 50_000, 'cifar100': 50_000}


NAMES = ('train_step', 'eval_step', 'deploy_forward')


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted function of the run with abstract arguments, ready to compile."""
  name: str
  lowered: Any  # jax.stages.Lowered
  batch: int  # images per call, all devices together
  useful_flops_per_image: float | None  # None: the model's MACs are not counted


def dataset_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(num_classes, num_train_examples) of the config's data set, without reading its data.

  tfds data sets: the classes from tfds's feature description and the published training-split
  size (the data need not be prepared); 'digits' is built in; 'image_folder' lists its folders.
  """
  if config.dataset in _TFDS_TRAIN_EXAMPLES:
    label = tfds.builder(config.dataset, data_dir=config.data_dir).info.features['label']
    return label.num_classes, _TFDS_TRAIN_EXAMPLES[config.dataset]
  info = input_pipeline.dataset_info(config.dataset, data_dir=config.data_dir)
  return info.num_classes, info.num_train_examples


def _images(batch: int, size: int, batch_sharding,
            dtype: str = 'float32') -> dict[str, jax.ShapeDtypeStruct]:
  """The input pipeline's batch: images (`dtype`) and int32 labels, split over the mesh."""
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), dtype, sharding=batch_sharding),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)}


def _useful_flops(model, size: int, forwards: int) -> float | None:
  if not isinstance(model, repmlpnet.RepMLPNet):
    return None
  return 2.0 * forwards * macs.macs_per_image(model, size)


def lower(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          names: tuple[str, ...] = NAMES) -> list[Program]:
  """train.py's programs for `config` on `mesh`, lowered (nothing compiled but reparam).

  Args:
    config: an experiment config (configs/common.py).
    mesh: a Mesh over the target's devices (train.sharding.create_mesh(topologies.devices(t))).
    names: which of NAMES.
  Returns:
    The programs of `names`, in the order of NAMES.
  """
  for what in ('global_batch_size', 'eval_batch_size'):
    if config[what] % mesh.size:
      raise cli.ConfigError(f'config.{what}={config[what]} must be a multiple of the '
                            f'{mesh.size} chips (each gets an equal share).')
  num_classes, num_train = dataset_shape(config)
  steps = experiment.derive_steps(config, num_train)
  exp = experiment.Experiment(config, num_classes=num_classes, steps=steps, mesh=mesh)
  train_batch = _images(config.global_batch_size, config.image_size, exp.batch_sharding)
  eval_batch = _images(config.eval_batch_size, config.eval_image_size, exp.batch_sharding,
                       exp.eval_image_dtype)
  eval_batch['mask'] = jax.ShapeDtypeStruct((config.eval_batch_size,), jnp.bool_,
                                            sharding=exp.batch_sharding)
  state = exp.abstract_state
  # Evaluation runs on the variables as Experiment.evaluate gathers them.
  variables = jax.eval_shape(exp.gather_variables,
                             {'params': state['params'], 'batch_stats': state['batch_stats']})
  programs = []
  if 'train_step' in names:
    programs.append(Program('train_step', exp.train_step.lower(state, train_batch),
                            config.global_batch_size,
                            _useful_flops(exp.model, config.image_size, 3)))
  if 'eval_step' in names:
    programs.append(Program('eval_step', exp.eval_counts.lower(variables, eval_batch),
                            config.eval_batch_size,
                            _useful_flops(exp.model, config.eval_image_size, 1)))
  if 'deploy_forward' in names:
    # The deploy variables live where the compiled reparam puts them during evaluation, in the
    # dtype it gives them (Experiment.deploy_variables).
    reparam = exp.deploy_variables.lower(variables).compile()
    deploy_variables = sharding.placed(jax.eval_shape(exp.deploy_variables, variables),
                                       reparam.output_shardings)
    programs.append(Program('deploy_forward',
                            exp.deploy_eval_counts.lower(deploy_variables, eval_batch),
                            config.eval_batch_size,
                            _useful_flops(exp.deploy_model, config.eval_image_size, 1)))
  return programs
