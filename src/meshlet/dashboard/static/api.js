// The dashboard's JSON API (CONTRACT §5), and whether it is reachable.
//
// Every request goes through getJSON, which tells the listeners (the banner) whether the API
// answered: a refused connection or a 5xx shows the banner, the next good answer hides it.
// A 4xx is the caller's business (an unknown trace id) and says nothing about reachability.
// Paths are relative to the page, so the dashboard also works behind a path prefix.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: no answer at all
  }
}

const listeners = new Set();

/** Call fn(problem) after every request: problem is null when the API answered. */
export function onReachability(fn) {
  listeners.add(fn);
}

function report(problem) {
  for (const fn of listeners) fn(problem);
}

export async function getJSON(path, params = {}, signal = undefined) {
  const url = new URL(path, document.baseURI);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  let response;
  try {
    response = await fetch(url, { signal, cache: "no-store", headers: { accept: "application/json" } });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    report({ status: 0, url: url.origin });
    throw new ApiError(0, `no answer from ${url.origin}`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body?.error ?? body?.message ?? (text.slice(0, 200) || response.statusText);
    report(response.status >= 500 ? { status: response.status, url: url.origin, message } : null);
    throw new ApiError(response.status, String(message));
  }
  report(null);
  return body;
}

/**
 * Run `task` now and then every `seconds` after each run ends (never two at once), until
 * `signal` aborts. A failed run is left to the banner; the next one retries. Runs are skipped
 * while the tab is hidden and resume when it shows again.
 */
export function poll(task, seconds, signal) {
  let timer = 0;
  const run = async () => {
    if (signal.aborted) return;
    if (!document.hidden) {
      try {
        await task();
      } catch (error) {
        if (error.name !== "AbortError" && !(error instanceof ApiError)) console.error(error);
      }
    }
    if (!signal.aborted) timer = setTimeout(run, seconds * 1000);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  run();
}
