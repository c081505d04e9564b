"""RandAugment of the official RepMLPNet recipe, in TensorFlow graph ops (runs inside tf.data).

The official ImageNet command trains with the `raug15` preset of the authors' `randaug.py`
(`RandAugPolicy(layers=2, magnitude=15)`): for every image, two times in a row, pick one op
uniformly (with replacement) from the 16 below and a magnitude *level* uniformly from the
integers 0..14, and always apply it. Levels are on a scale whose nominal maximum is 10
(`MAX_LEVEL`), so levels 11..14 go beyond the usual ranges (e.g. rotation up to 42 degrees).
Signed ops flip the sign of their argument with probability 1/2.

| op            | argument at level L (L in 0..14)            | level 0                  |
|---------------|---------------------------------------------|--------------------------|
| AutoContrast  | none                                        |                          |
| Equalize      | none (PIL's per-channel histogram equalize) |                          |
| Invert        | none                                        |                          |
| Rotate        | +-L/10*30 degrees, centre, fill 128         | identity                 |
| PosterizeTpu  | keep int(L/10*4) high bits                  | black image (official)   |
| Solarize      | invert pixels >= int(L/10*256)              | invert all (official)    |
| SolarizeAdd   | add int(L/10*110) to pixels < 128           | identity                 |
| Color         | blend gray->image, factor L/10*1.8+0.1      | near-gray image          |
| Contrast      | blend mean->image, factor L/10*1.8+0.1      | near-flat image          |
| Brightness    | blend black->image, factor L/10*1.8+0.1     | near-black image         |
| Sharpness     | blend smoothed->image, factor L/10*1.8+0.1  | blurred image            |
| ShearX/ShearY | +-L/10*0.3 shear, fill 128                  | identity                 |
| TranslateXRel | +-L/10*0.45 of the width, fill 128          | identity                 |
| TranslateYRel | +-L/10*0.45 of the height, fill 128         | identity                 |
| Cutout        | square hole of side max(2, L/10*40) px      | 2x2 hole                 |

This differs from timm's `rand-m9-mstd0.5-inc1` (15 ops without Cutout, magnitude ~N(9, 0.5),
"increasing" posterize/solarize, 50% apply probability); the official policy is reproduced
because the released numbers were trained with it. Known deviations from the PIL original:
geometric ops always interpolate bilinearly (the original draws bilinear or bicubic per call;
TF's projective transform has no bicubic), and the hole of Cutout is filled with gray 128 (the
authors' `cutout.py` is not published).

All ops take and return uint8 (H, W, 3) images; randomness is stateless (seeded), so the same
seed gives the same augmentation on any machine and after a restart.
"""

import math
from typing import Callable

import tensorflow as tf
try:  # indexed_case (what tf.switch_case calls) can keep a Case op functional: see _switch_case.
  from tensorflow.python.ops import cond_v2  # pylint: disable=g-direct-tensorflow-import
except ImportError:  # A TensorFlow that moved it: tf.switch_case, the same values, slower.
  cond_v2 = None

MAX_LEVEL = 10.0  # Level at which each op reaches its nominal maximum.
FILL = 128  # Gray used for pixels that geometric ops pull in from outside the image.

OpFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor): extrapolates past 1, clips, truncates."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  # Clipped to [0, 255], the cast's truncation toward zero is the floor PIL takes.
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L') with its fixed-point rounding, as float32 (H, W, 1) of whole numbers.

  (r * 19595 + g * 38470 + b * 7471 + 0x8000) // 65536 as one small matmul: every partial sum
  is a whole number below 2**24, so float32 computes it exactly.
  """
  weights = tf.constant([[19595.0], [38470.0], [7471.0]])
  weighted = tf.reshape(tf.matmul(tf.reshape(tf.cast(image, tf.float32), [-1, 3]), weights),
                        tf.concat([tf.shape(image)[:2], [1]], 0))
  return tf.floor((weighted + 0x8000) / 65536.0)


def _full_shape(values: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
  """Per-channel values (3,) spelled out to the image's shape.

  TF's element-wise ops are several times slower when they broadcast a (3,) operand over an
  (H, W, 3) image than on operands of equal shape, so the ops below never do.
  """
  if image.shape.is_fully_defined():
    return tf.tile(values[None, None], [image.shape[0], image.shape[1], 1])
  return tf.tile(values[None, None], tf.concat([tf.shape(image)[:2], [1]], 0))


def _lut_index(image: tf.Tensor) -> tf.Tensor:
  """int32 image[..., c] + 256 c: where each pixel reads a table of the three channels' tables."""
  return tf.cast(image, tf.int32) + _full_shape(tf.constant([0, 256, 512]), image)


def _apply_luts(index: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
  """image[..., c] -> luts[c][image[..., c]] (index: _lut_index(image); luts: uint8 (3, 256))."""
  return tf.gather(tf.reshape(luts, [-1]), index)


def _values() -> tf.Tensor:
  """Every uint8 value 0..255 as int32, the domain of a lookup table."""
  return tf.range(256)


def _per_channel(values: tf.Tensor) -> tf.Tensor:
  """(H, W) -> (H, W, 3), repeated over channels: a product with ones (exact, cheaper than tile)."""
  return tf.reshape(tf.matmul(tf.reshape(values, [-1, 1]), tf.ones([1, 3])),
                    tf.concat([tf.shape(values), [3]], 0))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds a bilinear blend of uint8 pixels back to uint8.

  Its two weights per axis, (floor + 1) - s and s - floor, are non-negative and sum to 1 up to
  an ulp, so the values lie within [0, 255.01): rounding needs no clipping.
  """
  return tf.cast(tf.round(image), tf.uint8)


def _pil_transform(matrix: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
  """TF's (8,) projective transform that samples as PIL's Image.transform(AFFINE, M, t) does.

  PIL puts pixel centres at +0.5, TF at integer indices; the offset is shifted so both sample
  the same points (and a zero-magnitude op is an exact identity).
  """
  offset = offset + tf.linalg.matvec(matrix - tf.eye(2), tf.constant([0.5, 0.5]))
  return tf.stack([matrix[0, 0], matrix[0, 1], offset[0],
                   matrix[1, 0], matrix[1, 1], offset[1], 0.0, 0.0])


def _pil_affine(image: tf.Tensor, matrix: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
  """Apply PIL's Image.transform(AFFINE, (a, b, c, d, e, f)): output (x, y) <- input M p + t.

  Bilinear, pixels from outside the image are FILL; TF's projective transform does the work.
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None],
      transforms=_pil_transform(matrix, offset)[None],
      output_shape=tf.shape(image)[:2],
      fill_value=float(FILL),
      interpolation='BILINEAR',
      fill_mode='CONSTANT')[0]
  return _to_uint8(out)


def _add_rounded_once(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """a + b of float32 tensors, rounded to float32 once, whatever the graph optimizer does.

  Grappler's arithmetic optimizer regroups chains of additions ((a + b) + c may run as
  (a + c) + b), which changes float32 roundings. Summed in float64 (exact for these magnitudes;
  rounding float64 to float32 then gives the float32 sum) behind casts, the sum stays in place.
  """
  return tf.cast(tf.cast(a, tf.float64) + tf.cast(b, tf.float64), tf.float32)


def _shear(image: tf.Tensor, factor: tf.Tensor, axis: int) -> tf.Tensor:
  """_pil_affine of a shear along `axis` (1: x, ShearX; 0: y, ShearY), bit for bit, faster.

  A shear samples every output pixel at an exact integer coordinate across `axis` and a
  fractional coordinate s along it, so TF's bilinear projective transform reduces to
  ((floor s + 1) - s) * p[floor s] + (s - floor s) * p[floor s + 1] (the weight of the other
  neighbouring row or column is exactly 0). Its kernel computes s as (t_a x + t_b y) + t_c in
  float32, left to right; the same float32 operations here, with two gathers of pixels instead
  of the per-pixel transform, are cheaper (benchmarks/README.md, input pipeline).
  """
  zero, one = tf.zeros_like(factor), tf.ones_like(factor)
  matrix = tf.stack([tf.stack([one, factor if axis == 1 else zero]),
                     tf.stack([factor if axis == 0 else zero, one])])
  t = _pil_transform(matrix, tf.zeros([2]))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  xs = tf.cast(tf.range(width), tf.float32)[None, :]
  ys = tf.cast(tf.range(height), tf.float32)[:, None]
  row = 0 if axis == 1 else 3  # t[row:row + 3] maps (x, y, 1) to the sheared coordinate.
  sample = _add_rounded_once(t[row] * xs + t[row + 1] * ys, t[row + 2])
  floor = tf.floor(sample)
  size = tf.cast(width if axis == 1 else height, tf.float32)
  border = tf.fill([height, 1, 3] if axis == 1 else [1, width, 3], tf.constant(FILL, tf.uint8))
  pixels = tf.reshape(tf.concat([border, image, border], axis), [-1, 3])

  def neighbour(position: tf.Tensor) -> tf.Tensor:
    # Positions outside the image read the fill border (index -1 or size, shifted by one).
    index = tf.cast(tf.clip_by_value(position, -1.0, size), tf.int32) + 1
    if axis == 1:
      index += tf.range(height)[:, None] * (width + 2)
    else:
      index = index * width + tf.range(width)[None, :]
    return tf.cast(tf.gather(pixels, index), tf.float32)

  out = (_per_channel((floor + 1.0) - sample) * neighbour(floor)
         + _per_channel(sample - floor) * neighbour(floor + 1.0))
  return _to_uint8(out)


def _signed(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.where(negate, -value, value)


def _enhance_factor(level: tf.Tensor) -> tf.Tensor:
  # In float64 like the Python original, then float32 like PIL's C blend: keeps results exact.
  return tf.cast(tf.cast(level, tf.float64) / MAX_LEVEL * 1.8 + 0.1, tf.float32)


# Each op: (image uint8 (H, W, 3), level float32 (), negate bool (), seed int (2,)) -> image.


def _auto_contrast(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor,
                   seed: tf.Tensor) -> tf.Tensor:
  del level, negate, seed
  pixels = tf.reshape(image, [-1, 3])
  lo = tf.cast(tf.reduce_min(pixels, axis=0), tf.float32)[:, None]
  hi = tf.cast(tf.reduce_max(pixels, axis=0), tf.float32)[:, None]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  values = tf.cast(_values(), tf.float32)[None]
  luts = tf.floor(tf.clip_by_value((values - lo) * scale, 0.0, 255.0))
  # PIL leaves a constant channel untouched.
  luts = tf.where(hi > lo, luts, values)
  return _apply_luts(_lut_index(image), tf.cast(luts, tf.uint8))


def _equalize(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize: per channel, a lookup table from the channel's histogram."""
  del level, negate, seed
  # One bincount for the three channels: channel c counts in bins 256 c .. 256 c + 255.
  index = _lut_index(image)
  hist = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])
  last = 255 - tf.argmax(tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), axis=1, output_type=tf.int32)
  last_nonzero = tf.gather(hist, last, batch_dims=1)
  step = ((tf.reduce_sum(hist, axis=1) - last_nonzero) // 255)[:, None]
  luts = tf.minimum((tf.cumsum(hist, axis=1, exclusive=True) + step // 2) // tf.maximum(step, 1),
                    255)
  luts = tf.where(step > 0, luts, _values()[None])  # A channel of (nearly) one value is kept.
  return _apply_luts(index, tf.cast(luts, tf.uint8))


def _invert(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del level, negate, seed
  return 255 - image


def _rotate(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del seed
  radians = _signed(level / MAX_LEVEL * 30.0, negate) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  # PIL rotates counter-clockwise about the image centre; this is its inverse map.
  matrix = tf.stack([tf.stack([cos, -sin]), tf.stack([sin, cos])])
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  centre = tf.stack([size[1], size[0]]) / 2.0
  return _pil_affine(image, matrix, centre - tf.linalg.matvec(matrix, centre))


# Point ops (each output pixel a function of the same input pixel) are uint8 arithmetic where it
# exists (a few cheap element-wise ops), lookup tables where it does not. Both avoid tf.where over
# the image, which costs more than the whole op otherwise.


def _posterize(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  shift = 8 - tf.cast(level / MAX_LEVEL * 4.0, tf.int32)  # bits to drop; 8 keeps nothing
  # v >> shift << shift keeps the high bits: one AND with those bits set.
  mask = tf.cast(tf.bitwise.left_shift(255, shift) % 256, tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def _solarize(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  threshold = tf.cast(level / MAX_LEVEL * 256.0, tf.int32)
  # 255 - v == v XOR 255: XOR with 255 where v >= threshold; a threshold above 255 inverts none.
  invert = tf.cast(tf.where(threshold <= 255, 255, 0), tf.uint8)
  above = tf.cast(image >= tf.cast(tf.minimum(threshold, 255), tf.uint8), tf.uint8)
  return tf.bitwise.bitwise_xor(image, above * invert)


def _solarize_add(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor,
                  seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  add = tf.cast(tf.cast(level / MAX_LEVEL * 110.0, tf.int32), tf.uint8)  # at most 154
  # min(v + add, 255) without overflow is min(v, 255 - add) + add; it replaces v where v < 128.
  # uint8 arithmetic wraps, so v + low * (new - v) is new where low is 1 and v where it is 0.
  low = tf.cast(image < 128, tf.uint8)
  return image + low * (tf.minimum(image, 255 - add) + add - image)


def _color(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  gray = _grayscale(image)
  return _blend(_per_channel(tf.squeeze(gray, -1)), image, _enhance_factor(level))


def _contrast(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level))


def _brightness(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor,
                seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def _sharpness(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate, seed
  # PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded); it leaves the
  # one-pixel border unfiltered. The weighted sum s of 9 pixels is a whole number, computed
  # exactly in float32 from shifted slices; s / 13 is never within 1/26 of a half, so any
  # float rounding of the filter rounds as (s + 6) // 13, which is exact in float32 as well.
  x = tf.cast(image, tf.float32)
  rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
  total = rows[:-2] + rows[1:-1] + rows[2:] + 4.0 * x[1:-1, 1:-1]
  smooth = tf.floor((total + 6.0) / 13.0)
  middle = tf.concat([x[1:-1, :1], smooth, x[1:-1, -1:]], 1)
  degenerate = tf.concat([x[:1], middle, x[-1:]], 0)
  return _blend(degenerate, image, _enhance_factor(level))


def _shear_x(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del seed
  return _shear(image, _signed(level / MAX_LEVEL * 0.3, negate), axis=1)


def _shear_y(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del seed
  return _shear(image, _signed(level / MAX_LEVEL * 0.3, negate), axis=0)


def _translate_rows(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  """_pil_affine of a vertical translation by `pixels`, computed row by row: the same result.

  With an integer column coordinate, TF's projective transform reduces to a blend of two source
  rows with per-row weights, in exactly these float32 operations (source row y + pixels, weights
  ceil - y and y - floor, fill outside the image). Gathering whole rows is several times
  cheaper than the per-pixel transform.
  """
  height = tf.shape(image)[0]
  x = tf.cast(image, tf.float32)
  padded = tf.pad(x, [[1, 1], [0, 0], [0, 0]], constant_values=float(FILL))
  source = tf.range(tf.cast(height, tf.float32)) + pixels
  floor = tf.floor(source)
  row = tf.cast(floor, tf.int32)
  above = tf.gather(padded, tf.clip_by_value(row, -1, height) + 1)
  below = tf.gather(padded, tf.clip_by_value(row + 1, -1, height) + 1)
  # Weights spelled out to the image's shape: a broadcasting multiply would cost more.
  reps = tf.stack([1, tf.shape(image)[1], 3])
  weight_above = tf.tile(((floor + 1.0) - source)[:, None, None], reps)
  weight_below = tf.tile((source - floor)[:, None, None], reps)
  return _to_uint8(weight_above * above + weight_below * below)


def _translate_x_rel(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor,
                     seed: tf.Tensor) -> tf.Tensor:
  del seed
  pixels = _signed(level / MAX_LEVEL * 0.45, negate) * tf.cast(tf.shape(image)[1], tf.float32)
  return tf.transpose(_translate_rows(tf.transpose(image, [1, 0, 2]), pixels), [1, 0, 2])


def _translate_y_rel(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor,
                     seed: tf.Tensor) -> tf.Tensor:
  del seed
  pixels = _signed(level / MAX_LEVEL * 0.45, negate) * tf.cast(tf.shape(image)[0], tf.float32)
  return _translate_rows(image, pixels)


def _cutout(image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  del negate
  half = tf.cast(tf.maximum(2.0, level / MAX_LEVEL * 40.0), tf.int32) // 2
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  centre_y = tf.random.stateless_uniform([], y_seed, 0, height, tf.int32)
  centre_x = tf.random.stateless_uniform([], x_seed, 0, width, tf.int32)
  top, bottom = tf.maximum(centre_y - half, 0), tf.minimum(centre_y + half, height)
  left, right = tf.maximum(centre_x - half, 0), tf.minimum(centre_x + half, width)
  # The image reassembled around the hole: copies of slices, no per-pixel select.
  hole = tf.fill([bottom - top, right - left, 3], tf.constant(FILL, tf.uint8))
  band = tf.concat([image[top:bottom, :left], hole, image[top:bottom, right:]], 1)
  return tf.concat([image[:top], band, image[bottom:]], 0)


# The official `_RAND_TRANSFORMS`, in its order.
_OPS: tuple[tuple[str, OpFn], ...] = (
    ('AutoContrast', _auto_contrast),
    ('Equalize', _equalize),
    ('Invert', _invert),
    ('Rotate', _rotate),
    ('PosterizeTpu', _posterize),
    ('Solarize', _solarize),
    ('SolarizeAdd', _solarize_add),
    ('Color', _color),
    ('Contrast', _contrast),
    ('Brightness', _brightness),
    ('Sharpness', _sharpness),
    ('ShearX', _shear_x),
    ('ShearY', _shear_y),
    ('TranslateXRel', _translate_x_rel),
    ('TranslateYRel', _translate_y_rel),
    ('Cutout', _cutout),
)
OP_NAMES: tuple[str, ...] = tuple(name for name, _ in _OPS)
GEOMETRIC_OPS: tuple[str, ...] = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def apply_op(image: tf.Tensor, name: str, level: float | tf.Tensor, *,
             negate: bool | tf.Tensor = False,
             seed: tf.Tensor | tuple[int, int] = (0, 0)) -> tf.Tensor:
  """Applies one RandAugment op by name (see the module docstring for the level convention).

  Args:
    image: uint8 (H, W, 3).
    name: one of OP_NAMES.
    level: magnitude level, 0..MAX_LEVEL nominally (the policy draws up to 14).
    negate: flip the sign of signed ops' argument.
    seed: stateless seed (2 ints), used by Cutout only.

  Returns:
    uint8 image of the same shape.
  """
  ops = dict(_OPS)
  if name not in ops:
    raise ValueError(f'Unknown RandAugment op {name!r}; expected one of {OP_NAMES}.')
  return ops[name](image, tf.cast(level, tf.float32), tf.convert_to_tensor(negate, tf.bool),
                   tf.cast(seed, tf.int64))


def _switch_case(index: tf.Tensor, branches: list[Callable[[], tf.Tensor]]) -> tf.Tensor:
  """tf.switch_case(index, branches), kept a functional Case op in graphs.

  tf.switch_case lets TensorFlow lower the op to Switch/Merge nodes; TensorFlow's executor then
  passes dead tensors through every node of all 16 branches for every image, which costs more
  than the op that runs. The functional Case runs only the chosen branch.
  """
  if tf.executing_eagerly():
    return branches[int(index)]()
  if cond_v2 is None:
    return tf.switch_case(index, branches)
  return cond_v2.indexed_case(index, branches, lower_using_switch_merge=False)


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = 2,
                num_levels: int = 15) -> tf.Tensor:
  """The official policy: `num_layers` ops, each uniform over OP_NAMES, level in range(num_levels).

  Args:
    image: uint8 (H, W, 3).
    seed: stateless seed, int (2,); equal seeds give equal results.
    num_layers: ops applied in sequence (official: 2).
    num_levels: levels drawn from range(num_levels) (official `raug15`: 15, i.e. 0..14).

  Returns:
    The augmented uint8 image, same shape.
  """
  if num_levels < 1 or num_layers < 0:
    raise ValueError(f'Need num_layers >= 0 and num_levels >= 1, got {num_layers}, {num_levels}.')
  if num_layers == 0:
    return image
  layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)

  def layer(i: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    op_seed, level_seed, sign_seed, apply_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[i], 4))
    index = tf.random.stateless_uniform([], op_seed, 0, len(_OPS), tf.int32)
    level = tf.random.stateless_uniform([], level_seed, 0, num_levels, tf.int32)
    level = tf.cast(level, tf.float32)
    negate = tf.random.stateless_uniform([], sign_seed) < 0.5
    branches = [lambda fn=fn: fn(image, level, negate, apply_seed) for _, fn in _OPS]
    return i + 1, tf.ensure_shape(_switch_case(index, branches), image.shape)

  # A loop rather than unrolled layers: one copy of the 16 branches keeps the tf.data graph
  # small, which makes building each epoch's pipeline several times faster.
  return tf.while_loop(lambda i, _: i < num_layers, layer, (tf.constant(0), image))[1]
