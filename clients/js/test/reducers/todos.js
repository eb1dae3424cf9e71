// A todo list reducer, run by the node (`reducer = { js = "todos.js" }`)
// and by the JavaScript replicas of js-reducer.test.js. The last action
// types exist to test the node's sandbox and limits.

const initial = { todos: [], done: 0 };

export default function todos(state = initial, action) {
  switch (action.type) {
    case 'add':
      return { ...state, todos: [...state.todos, { text: action.payload, done: false }] };
    case 'toggle': {
      const t = state.todos[action.payload];
      if (!t) throw new RangeError(`no todo ${action.payload}`);
      const list = state.todos.map((x, i) => (i === action.payload ? { ...x, done: !x.done } : x));
      return { ...state, todos: list, done: list.filter(x => x.done).length };
    }
    case 'clear':
      return initial;
    // Never ends: cut by the node's time limit.
    case 'spin':
      for (;;) { /* spin */ }
    // Takes memory without bound: cut by the node's memory limit.
    case 'hog': {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20));
    }
    // Reads the clock, which a reducer may not.
    case 'stamp':
      return { ...state, at: Date.now() };
    default:
      return state;
  }
}
