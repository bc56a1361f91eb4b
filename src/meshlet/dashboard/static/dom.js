// Building DOM and SVG elements in one expression, without a framework.
//
// h("a", {href: "#/graph", class: "on"}, "Graph") makes <a href="#/graph" class="on">Graph</a>.
// Attributes named on<event> with a function value become listeners; null, undefined and false
// attributes and children are skipped; nested arrays of children are flattened.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  el.append(...flatten(children));
  return el;
}

function flatten(children) {
  const out = [];
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) out.push(...flatten(child));
    else out.push(child instanceof Node ? child : String(child));
  }
  return out;
}

/** An HTML element. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace el's children (nested arrays flattened, null skipped); returns el. */
export function fill(el, ...children) {
  el.replaceChildren(...flatten(children));
  return el;
}

/** Set (or, for null, remove) attributes of an existing element; returns it. */
export function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) el.removeAttribute(name);
    else el.setAttribute(name, String(value));
  }
  return el;
}

/** Everything a view shows when there is nothing to show yet, and what to do about it. */
export function emptyState(title, ...hint) {
  return h("div", { class: "empty" }, h("h2", {}, title), h("p", {}, ...hint));
}

/** `text` as inline code. */
export function code(text) {
  return h("code", {}, text);
}
