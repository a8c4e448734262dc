/**
 * Tensor: a typed, contiguous, row-major handle to memory on the host or a GPU.
 *
 * GPU work is queued on the device's stream and returns at once; reading a result (toArray, bytes)
 * waits on a worker thread, never on the event loop. dispose() frees GPU memory right away; the
 * garbage collector is only a safety net.
 */
import { awaitNative, callNative, errorAtCaller, invalid } from './errors';
import { DType, HostArray, hostArrayOf, isDType, isFloat } from './dtype';
import { native, TensorHandle } from './native';

/** 'cpu', 'cuda' (device 0) or 'cuda:N'. */
export type DeviceName = 'cpu' | 'cuda' | `cuda:${number}`;

export interface TensorOptions {
  /** Default 'f32'. */
  dtype?: DType;
  /** Default 'cpu'. */
  device?: DeviceName;
}

/** What fromArray accepts. Floats pass through float32 on their way to f16, bf16 or fp8. */
export type ArrayData = ArrayLike<number> | Float32Array | Float64Array | Int8Array | Uint8Array | Int32Array | BigInt64Array;

function normalizeDevice(device: DeviceName): string {
  return device === 'cuda' ? 'cuda:0' : device;
}

function optionsOf(opts: TensorOptions | undefined): { dtype: DType; device: string } {
  const dtype = opts?.dtype ?? 'f32';
  if (!isDType(dtype)) throw invalid('E_DTYPE', 'dtype', 'one of f32, f16, bf16, fp8e4m3, i8, u8, i32, i64', dtype);
  const device = opts?.device ?? 'cpu';
  if (typeof device !== 'string') throw invalid('E_DEVICE', 'device', "'cpu', 'cuda' or 'cuda:N'", device);
  return { dtype, device: normalizeDevice(device) };
}

const INT_RANGE: Partial<Record<DType, [number, number]>> = {
  i8: [-128, 127],
  u8: [0, 255],
  i32: [-2147483648, 2147483647],
  i64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
};

/** The typed array handed to the native side, and the dtype it holds. */
function hostSource(data: ArrayData, dtype: DType): [ArrayBufferView, DType] {
  if (data instanceof Float32Array) return [data, 'f32'];
  if (data instanceof Int8Array) return [data, 'i8'];
  if (data instanceof Uint8Array) return [data, 'u8'];
  if (data instanceof Int32Array) return [data, 'i32'];
  if (data instanceof BigInt64Array) return [data, 'i64'];
  if (isFloat(dtype)) return [Float32Array.from(data as ArrayLike<number>), 'f32'];
  // Plain numbers into an integer dtype: each must be an integer in range, not silently wrapped.
  const [lo, hi] = INT_RANGE[dtype]!;
  const values = data as ArrayLike<number>;
  const out = new BigInt64Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    if (!Number.isInteger(v) || v < lo || v > hi) throw invalid('E_RANGE', `data[${i}]`, `integer in [${lo}, ${hi}] for dtype ${dtype}`, v);
    out[i] = BigInt(v);
  }
  return [out, 'i64'];
}

const registry = new FinalizationRegistry<TensorHandle>((handle) => handle.dispose());

export class Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  #handle: TensorHandle | undefined;

  /** @internal Tensors are made by the static constructors and ops, not with `new`. */
  constructor(handle: TensorHandle, dtype: DType, shape: readonly number[], device: string) {
    this.#handle = handle;
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.device = device;
    registry.register(this, handle, this);
  }

  /** Copies `data` into a new tensor; `shape` defaults to [data.length]. */
  static fromArray(data: ArrayData, shape?: readonly number[], opts?: TensorOptions): Tensor {
    const { dtype, device } = optionsOf(opts);
    if (data === null || typeof data !== 'object' || typeof (data as ArrayLike<number>).length !== 'number') {
      throw invalid('E_DTYPE', 'data', 'an array or typed array', data);
    }
    const dims = shape ?? [data.length];
    const [source, sourceDtype] = hostSource(data, dtype);
    return new Tensor(callNative(() => native().fromHost(source, sourceDtype, dims, dtype, device)), dtype, dims, device);
  }

  /** A tensor holding exactly these bytes (the dtype's raw encoding), e.g. f16 bit patterns. */
  static fromBytes(bytes: Uint8Array, shape: readonly number[], opts?: TensorOptions): Tensor {
    const { dtype, device } = optionsOf(opts);
    if (!(bytes instanceof Uint8Array)) throw invalid('E_DTYPE', 'bytes', 'a Uint8Array', bytes);
    // The bytes arrive untouched as u8, then the same storage is viewed as the requested dtype.
    const raw = callNative(() => native().fromHost(bytes, 'u8', [bytes.length], 'u8', device));
    try {
      return new Tensor(callNative(() => native().reinterpret(raw, dtype, shape)), dtype, shape, device);
    } finally {
      raw.dispose();
    }
  }

  /** Uninitialised memory: contents are whatever the allocator hands back. */
  static empty(shape: readonly number[], opts?: TensorOptions): Tensor {
    const { dtype, device } = optionsOf(opts);
    return new Tensor(callNative(() => native().empty(shape, dtype, device)), dtype, shape, device);
  }

  static zeros(shape: readonly number[], opts?: TensorOptions): Tensor {
    return Tensor.full(shape, 0, opts);
  }

  static full(shape: readonly number[], value: number, opts?: TensorOptions): Tensor {
    const t = Tensor.empty(shape, opts);
    t.fill(value);
    return t;
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /** @internal The native handle; throws E_DISPOSED after dispose(). */
  handle(): TensorHandle {
    if (this.#handle === undefined) {
      throw errorAtCaller('E_DISPOSED', `Expected a live Tensor but received a disposed ${this.dtype} [${this.shape.join(', ')}] tensor`);
    }
    return this.#handle;
  }

  /** Sets every element (in place) and returns this tensor. */
  fill(value: number): this {
    const handle = this.handle();
    callNative(() => native().fill(handle, value));
    return this;
  }

  /** A copy converted to `dtype`, on the same device. */
  cast(dtype: DType): Tensor {
    const handle = this.handle();
    return new Tensor(callNative(() => native().cast(handle, dtype)), dtype, this.shape, this.device);
  }

  /** A copy on `device` (a copy even when it is this tensor's device). */
  to(device: DeviceName): Tensor {
    const handle = this.handle();
    const target = normalizeDevice(device);
    return new Tensor(callNative(() => native().to(handle, target)), this.dtype, this.shape, target);
  }

  /** Copies `source` (same dtype and shape, any device) into this tensor. */
  copyFrom(source: Tensor): this {
    const target = this.handle();
    const from = source.handle();
    callNative(() => native().copyInto(from, target));
    return this;
  }

  /** Rows [start, end) along dim 0, sharing this tensor's memory. */
  slice(start: number, end: number = this.shape[0] ?? 0): Tensor {
    const handle = this.handle();
    const view = callNative(() => native().slice(handle, start, end));
    return new Tensor(view, this.dtype, [end - start, ...this.shape.slice(1)], this.device);
  }

  /** The same bytes viewed as another dtype and shape (as many bytes in all), sharing memory. */
  reinterpret(dtype: DType, shape: readonly number[]): Tensor {
    const handle = this.handle();
    return new Tensor(callNative(() => native().reinterpret(handle, dtype, shape)), dtype, shape, this.device);
  }

  /** The same memory under another shape with as many elements. */
  reshape(shape: readonly number[]): Tensor {
    const handle = this.handle();
    return new Tensor(callNative(() => native().reshape(handle, shape)), this.dtype, shape, this.device);
  }

  /** The elements on the host: Float32Array for float dtypes, the matching integer array otherwise. */
  async toArray(): Promise<HostArray> {
    const handle = this.handle();
    const buffer = await awaitNative(callNative(() => native().read(handle, true)));
    return hostArrayOf(this.dtype, buffer);
  }

  /** The raw bytes of the elements, in the dtype's own encoding. */
  async bytes(): Promise<Uint8Array> {
    const handle = this.handle();
    return new Uint8Array(await awaitNative(callNative(() => native().read(handle, false))));
  }

  /** Frees this tensor's memory now (once no view shares it). Safe to call twice. */
  dispose(): void {
    if (this.#handle === undefined) return;
    registry.unregister(this);
    this.#handle.dispose();
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    return `Tensor(${this.dtype} [${this.shape.join(', ')}] on ${this.device}${this.disposed ? ', disposed' : ''})`;
  }
}
