/**
 * KvflashError: every failure kvflash reports, with a machine-readable `code`.
 * Native errors are re-created here, at the JS call site, so that the stack points at the caller.
 */

export type ErrorCode =
  | 'E_DTYPE'
  | 'E_SHAPE'
  | 'E_DEVICE'
  | 'E_RANGE'
  | 'E_DISPOSED'
  | 'E_OOM'
  | 'E_CUDA'
  | 'E_UNSUPPORTED';

const CODES: ReadonlySet<string> = new Set<ErrorCode>([
  'E_DTYPE',
  'E_SHAPE',
  'E_DEVICE',
  'E_RANGE',
  'E_DISPOSED',
  'E_OOM',
  'E_CUDA',
  'E_UNSUPPORTED',
]);

export class KvflashError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'KvflashError';
    this.code = code;
  }
}

/** "-1 of type number", "'x' of type string": the "received" half of a message. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'undefined';
  if (value === null) return 'null';
  if (typeof value === 'string') return `'${value}' of type string`;
  if (typeof value === 'object') return Array.isArray(value) ? 'an array' : `an instance of ${value.constructor?.name ?? 'Object'}`;
  return `${String(value)} of type ${typeof value}`;
}

/**
 * Drops the stack frames inside kvflash's own JS (this folder) from the top of a stack, so that
 * its first frame is the caller's line, as a user reading it expects.
 */
function atCaller<E extends Error>(error: E): E {
  const lines = (error.stack ?? '').split('\n');
  let first = 1;
  while (first < lines.length - 1 && lines[first]!.includes(__dirname)) first++;
  error.stack = [lines[0], ...lines.slice(first)].join('\n');
  return error;
}

/** Converts an error thrown by the native binding into a KvflashError thrown from the caller's line. */
export function fromNative(error: unknown): unknown {
  if (!(error instanceof Error)) return error;
  const code = (error as { code?: unknown }).code;
  if (typeof code !== 'string' || !CODES.has(code)) return error;
  return atCaller(new KvflashError(code as ErrorCode, error.message));
}

/** Runs a native call; a native error becomes a KvflashError thrown from the caller's line. */
export function callNative<T>(call: () => T): T {
  try {
    return call();
  } catch (error) {
    throw fromNative(error);
  }
}

/**
 * Awaits a native promise. The caller's stack is taken before awaiting and given to the
 * KvflashError for a rejection (an asynchronous native rejection carries no useful stack).
 */
export async function awaitNative<T>(promise: Promise<T>): Promise<T> {
  const callSite = atCaller(new Error());
  try {
    return await promise;
  } catch (error) {
    const converted = fromNative(error);
    if (converted instanceof KvflashError) {
      converted.stack = `${converted.name}: ${converted.message}${callSite.stack!.slice(callSite.stack!.indexOf('\n'))}`;
    }
    throw converted;
  }
}

/** A KvflashError whose stack starts at the caller's line. */
export function errorAtCaller(code: ErrorCode, message: string): KvflashError {
  return atCaller(new KvflashError(code, message));
}

/** A KvflashError for a bad argument, thrown from the caller's line. */
export function invalid(code: ErrorCode, name: string, expected: string, received: unknown): KvflashError {
  return errorAtCaller(code, `Expected ${expected} for ${name} but received ${describeValue(received)}`);
}
